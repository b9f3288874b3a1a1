"""MLflow "model from code" entry point: logged as the pyfunc's code and run when the model loads,
so the registered model carries no pickle (see pyfunc.py for the wrapper itself)."""
import mlflow.models

from ctxmem.export.pyfunc import OnnxGeneratorModel

mlflow.models.set_model(OnnxGeneratorModel())
